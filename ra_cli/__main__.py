from ra_cli.cli import app

app()
