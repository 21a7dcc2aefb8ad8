"""Which instance a call goes to: route tables, weighted splits, zones and load balancers."""
