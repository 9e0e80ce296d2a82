"""Real servers and small documented fakes shared by the tests."""
