"""The contracts package: Python stubs generated from protos/ (make protos), one per proto package."""
