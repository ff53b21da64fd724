"""What to tell a user whose corpus is missing (one source for every loader's message)."""

__all__ = ["INSTALL_HINT", "OFFLINE_CHOICES"]

OFFLINE_CHOICES = ("'fortunes' (in-domain) and 'bible' (out-of-domain), installed by "
                   "scripts/install_corpus.sh; 'tinystories:DIR' (a local copy of TinyStories); "
                   "'files:PATH[,PATH]' (.txt/.jsonl); 'synthetic'")
INSTALL_HINT = "run scripts/install_corpus.sh (installs the Debian packages fortunes-min, fortunes, " \
               "sword-text-web and diatheke with apt-get)"
