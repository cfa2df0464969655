from qlora_core.cli import entry

entry()
