"""One module per `braincam` command (see braincam/cli.py); each keeps heavy imports
inside `run`, so building the parser stays cheap."""
