"""Hub federation: suppressed count catalogue and federated ComBat."""
