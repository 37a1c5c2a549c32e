from dmr.cli.main import main

main()
