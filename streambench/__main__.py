from streambench.cli.app import main

main()
