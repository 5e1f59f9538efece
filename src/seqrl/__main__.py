from seqrl.cli import app

app(prog_name="seqrl")
