"""`python -m concept_jax.bench`: see the package docstring."""
import sys

from concept_jax.bench import main

try:
  main()
except (ValueError, FileNotFoundError, ImportError) as e:  # their messages say the fix
  sys.exit(f'concept_jax.bench: error: {e}')
