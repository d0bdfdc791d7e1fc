import sys

from latent_jax.cli import main

sys.exit(main())
