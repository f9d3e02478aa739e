from aisec_train.cli import main

main()
