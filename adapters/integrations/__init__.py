"""The controller dropped into serving systems. Integrations build on ports only."""
