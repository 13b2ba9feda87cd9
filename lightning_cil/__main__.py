from lightning_cil.cli import main

main()
