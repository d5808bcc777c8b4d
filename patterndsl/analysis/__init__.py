"""The analyser: exact and symbolic cost, tile efficiency and receptive field of a pattern (`patc analyze`)."""
