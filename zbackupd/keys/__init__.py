"""Key derivation, in-memory secrets and the encrypted SSH identity."""
