"""Our own Encode side, a separate process speaking the fork's wire over Mooncake."""
