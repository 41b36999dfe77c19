from clpsurgery.cli import main

main()
