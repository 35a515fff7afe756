"""Teaching: the Stepper widget, exercises, walkthroughs, notebook stories, the memfd demo."""
