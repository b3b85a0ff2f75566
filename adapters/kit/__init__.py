"""The verification kit: a simulated world, the judge and everything that drives the controller to be judged.

Only tools and tests import it; ports and integrations never do.
"""
