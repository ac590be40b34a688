"""Attribution graphs (issue 29): the local replacement model, its nodes and edges, pruning and scores."""
