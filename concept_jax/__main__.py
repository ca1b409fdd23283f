"""The `concept-jax` command and `python -m concept_jax`: concept_jax/main.py, the training CLI.

main.py runs as __main__, exactly as `python -m concept_jax.main` runs it: absl's --help shows the
usage and flags of the __main__ module, which for a console script would otherwise be pip's launcher.
"""
import runpy


def cli():
  runpy.run_module('concept_jax.main', run_name='__main__', alter_sys=True)


if __name__ == '__main__':
  cli()
