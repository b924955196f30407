using System.ComponentModel;
using DiffBIR.Lab.Pipeline;
using DiffBIR.Lab.Training;
using Spectre.Console;
using Spectre.Console.Cli;

namespace DiffBIR.Lab.Cli.Commands;

public sealed class TrainTinySettings : CommandSettings
{
    [CommandOption("-o|--output <DIR>")] [Description("Where the weights and recipe.json go (default: the repository's weights/tiny).")]
    public string? Output { get; set; }
    [CommandOption("--seed <N>")] [Description("Seed of data, initialisation and every draw (default 2026, the committed weights).")]
    public long Seed { get; set; } = 2026;
    [CommandOption("--threads <N>")] [Description("torch threads, fixed for the run; the weights depend on it (default 1, the committed weights: these small tensors run faster on one thread).")]
    public int Threads { get; set; } = 1;
    [CommandOption("--steps <N>")] [Description("Smoke run: N steps per stage on 8 images instead of the recipe (not the committed weights).")]
    public int? Steps { get; set; }

    public override ValidationResult Validate()
    {
        if (Seed < 0) return ValidationResult.Error($"--seed: must be ≥ 0 (got {Seed})");
        if (Threads < 1 || Threads > 256) return ValidationResult.Error($"--threads: must be in 1…256 (got {Threads})");
        if (Steps is < 1) return ValidationResult.Error($"--steps: must be ≥ 1 (got {Steps})");
        if (Output is { } o && File.Exists(o)) return ValidationResult.Error($"--output: {o} is a file, not a folder");
        return ValidationResult.Success();
    }
}

/// <summary>
/// <c>diffbir-lab weights train-tiny</c>: trains the tiny DiffBIR (VAE → UNet prior → stage 1 → IRControlNet) on
/// procedural images with <see cref="TinyRecipe"/> and writes weights/tiny/*.safetensors and recipe.json.
/// </summary>
public sealed class TrainTinyCommand : Command<TrainTinySettings>
{
    public override int Execute(CommandContext context, TrainTinySettings s, CancellationToken ct)
    {
        var output = s.Output ?? Path.Combine(Path.GetDirectoryName(Presets.FindManifest())!, "tiny");
        var options = (s.Steps is int n ? TinyRecipeOptions.Short(n) : new TinyRecipeOptions()) with { Seed = s.Seed, Threads = s.Threads };
        AnsiConsole.WriteLine($"training the tiny DiffBIR into {output} (seed {s.Seed}, {s.Threads} threads{(s.Steps is int k ? $", smoke run: {k} steps per stage" : "")})");
        var result = TinyRecipe.Train(output, options, line => AnsiConsole.WriteLine(line), ct);
        foreach (var (file, sha) in result.Sha256) AnsiConsole.WriteLine($"{sha}  {file}");
        AnsiConsole.WriteLine($"recipe: {result.RecipePath}");
        return 0;
    }
}
