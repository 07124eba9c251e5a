from kvcdn.cli import main

# Guarded: multiprocessing's spawn re-imports the main module in its children (the bench's TCP sender).
if __name__ == "__main__":
    raise SystemExit(main())
