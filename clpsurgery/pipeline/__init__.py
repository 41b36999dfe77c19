"""The stages in order, on top of formats, vocab and mixing: plan, rebuild, transfer, manifest, and the read-only commands inspect and verify."""
