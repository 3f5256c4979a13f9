from cogalign.cli import main

main()
