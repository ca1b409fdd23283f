"""`python -m concept_jax.bench`: see the package docstring."""
import sys

from concept_jax import runtime
from concept_jax.bench import main

# The allocator settings `concept_jax.main` runs with; no compilation cache (compile times are figures).
runtime.restart_with_malloc_settings()
try:
  main()
except (ValueError, FileNotFoundError, ImportError) as e:  # their messages say the fix
  sys.exit(f'concept_jax.bench: error: {e}')
