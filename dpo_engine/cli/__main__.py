from dpo_engine.cli import main

main()
