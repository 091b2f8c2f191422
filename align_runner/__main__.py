from align_runner.cli import main

if __name__ == "__main__":
    main()
