"""What keeps calls succeeding: outlier detection, retry budgets and backoff."""
