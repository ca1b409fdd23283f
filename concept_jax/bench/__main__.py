"""`python -m concept_jax.bench`: see the package docstring."""
import sys

from concept_jax import runtime

# The allocator settings `concept_jax.main` runs with, before jax is imported (the restarted process
# imports it anyway); no compilation cache (compile times are figures).
runtime.restart_with_malloc_settings()

from concept_jax.bench.run import main  # noqa: E402  (after the restart)

try:
  main()
except (ValueError, FileNotFoundError, ImportError) as e:  # their messages say the fix
  sys.exit(f'concept_jax.bench: error: {e}')
