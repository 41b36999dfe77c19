"""Instruct models (issue 17): the source's chat template and the special tokens it names survive
the transfer, and eos agrees everywhere, so generation stops at the end of a turn."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from clpsurgery.cli import main
from clpsurgery.formats.checkpoint import Checkpoint
from clpsurgery.pipeline.tensor_io import as_tensor
from clpsurgery.pipeline.verify import verify_output

# ChatML, as SmolLM2-Instruct and Qwen2 write it.
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TURN = ["<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def instruct_source(tmp_path_factory, gpt2_tokenizer):
    """A tied GPT-2 instruct model: the GPT-2 vocabulary plus <|im_start|> and <|im_end|> (ids
    50257, 50258), a ChatML template, and <|im_end|> as eos (the end of a turn)."""
    transformers = pytest.importorskip("transformers")
    from clpsurgery.vocab.vocab_assets import save_tokenizer_folder

    tokenizer = gpt2_tokenizer.__class__.from_str(gpt2_tokenizer.to_str())
    tokenizer.add_special_tokens(TURN)
    folder = tmp_path_factory.mktemp("instruct-source")
    torch.manual_seed(5)
    config = transformers.GPT2Config(vocab_size=50259, n_embd=32, n_layer=2, n_head=2, n_positions=128, bos_token_id=50256, eos_token_id=50258)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    save_tokenizer_folder(tokenizer, folder, bos="<|endoftext|>", eos="<|im_end|>")
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config["chat_template"] = CHATML
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 50256, "eos_token_id": 50258}))
    return folder


@pytest.fixture(scope="module")
def converted(instruct_source, german_helper, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat") / "out"
    main(["init", "--quiet", str(instruct_source), str(german_helper), str(out)])
    return out


def test_template_tokens_are_kept_with_the_source_rows(converted, instruct_source, german_helper):
    from tokenizers import Tokenizer

    manifest = json.loads((converted / "clpsurgery.json").read_text())
    assert manifest["kept_source_specials"] == TURN
    helper_size = Tokenizer.from_file(str(german_helper / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    tok = Tokenizer.from_file(str(converted / "tokenizer.json"))
    ids = [tok.token_to_id(t) for t in TURN]
    assert ids == [helper_size, helper_size + 1]
    with Checkpoint.open(converted) as out, Checkpoint.open(instruct_source) as src:
        written = as_tensor(out.read_tensor("transformer.wte.weight")).numpy()
        source = as_tensor(src.read_tensor("transformer.wte.weight")).numpy()
    assert written.shape[0] == helper_size + 2
    assert np.array_equal(written[ids], source[[50257, 50258]])
    config = json.loads((converted / "config.json").read_text())
    generation = json.loads((converted / "generation_config.json").read_text())
    tok_config = json.loads((converted / "tokenizer_config.json").read_text())
    assert config["eos_token_id"] == generation["eos_token_id"] == ids[1] and tok_config["eos_token"] == "<|im_end|>"
    assert tok_config["chat_template"] == CHATML
    assert all(c.ok is not False for c in verify_output(converted, instruct_source))


def test_chat_template_renders_and_generation_stops_at_the_end_of_a_turn(converted):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(converted))
    messages = [{"role": "user", "content": "Wie spät ist es?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nWie spät ist es?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    vocab_size = json.loads((converted / "config.json").read_text())["vocab_size"]
    assert all(0 <= i < vocab_size for i in ids) and tok.convert_tokens_to_ids("<|im_start|>") in ids
    model = transformers.AutoModelForCausalLM.from_pretrained(str(converted)).eval()
    end = tok.convert_tokens_to_ids("<|im_end|>")

    class EndTurnAfter(transformers.LogitsProcessor):
        """Three free tokens, then the end of a turn: generate must stop there, by the output's
        own generation_config, though max_new_tokens allows more."""

        def __call__(self, input_ids, scores):
            if input_ids.shape[1] - len(ids) == 3:
                scores = torch.full_like(scores, -float("inf"))
                scores[:, end] = 0.0
            else:
                scores[:, end] = -float("inf")
            return scores

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, logits_processor=[EndTurnAfter()])
    new = out[0, len(ids):].tolist()
    assert len(new) == 4 and new[-1] == end


def test_no_keeps_the_target_tokenizer_as_it_is(instruct_source, german_helper, tmp_path):
    out = tmp_path / "out"
    main(["init", "--quiet", "--keep-source-specials", "no", str(instruct_source), str(german_helper), str(out)])
    assert (out / "tokenizer.json").read_bytes() == (german_helper / "tokenizer.json").read_bytes()
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    assert json.loads((out / "clpsurgery.json").read_text())["kept_source_specials"] == []


def test_apply_replays_the_kept_tokens(converted, instruct_source, tmp_path):
    from conftest import apply_reproduces

    assert apply_reproduces(converted, instruct_source, tmp_path / "again")
