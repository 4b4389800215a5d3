from streambench.cli import main

main()
