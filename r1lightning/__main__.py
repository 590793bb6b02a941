from r1lightning.cli import main

main()
