"""The receiver controller as a vLLM encoder-cache connector: ``EPDReceiverConnector`` (``connector.py``)."""
