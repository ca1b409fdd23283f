"""`python -m concept_jax.bench`: see the package docstring."""
from concept_jax.bench import main

main()
