from .trainer import cli

cli()
