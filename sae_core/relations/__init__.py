"""Features among their relatives (issue 27).

map.py   `saescope map`: a 2-D UMAP of an SAE's alive features (cosine on decoder rows, seeded),
         clustered with HDBSCAN, stored per mining run (feature_maps, feature_map_points) with
         each point's nearest features on the map; read by the map page and the feature page's inset
"""
