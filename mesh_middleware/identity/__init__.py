"""Service identity: SPIFFE IDs, JWT-SVID issuing and verification, signing keys."""
