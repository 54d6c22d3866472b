"""Pieces shared by the coordinator (`consortia.server`) and the node (`consortia.client`)."""
