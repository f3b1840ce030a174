"""The Hydra tasks: one module per job family. Each `*_task(cfg)` reads the config, calls the library, writes
results and logs what it did. Library modules never import this package; `vrlab.cli.TASKS` maps onto it."""
