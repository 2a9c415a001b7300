from promptmill.cli import main

main()
