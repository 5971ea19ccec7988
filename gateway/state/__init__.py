"""State that outlives one request or is shared by several instances, through the store
(``gateway.store``): flights (one upstream call for many identical requests), their leaders and
store log, and shared circuit / key cool-down state."""
