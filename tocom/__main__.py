from tocom.cli import main

main()
