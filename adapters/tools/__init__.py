"""The command line and what it runs: simulations, the bench, the distributed driver, our Encode process."""
