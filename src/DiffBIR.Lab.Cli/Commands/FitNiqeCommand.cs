using System.ComponentModel;
using DiffBIR.Lab.IO;
using DiffBIR.Lab.Metrics;
using DiffBIR.Lab.Metrics.Niqe;
using Spectre.Console;
using Spectre.Console.Cli;

namespace DiffBIR.Lab.Cli.Commands;

public sealed class FitNiqeSettings : CommandSettings
{
    [CommandOption("--hq <DIR>")]
    [Description("Folder of pristine (HQ) images to fit the model on.")]
    public string? Hq { get; set; }

    [CommandOption("-o|--output <FILE>")]
    [Description("The model file to write (default weights/niqe_lab.safetensors).")]
    public string Output { get; set; } = Path.Combine("weights", NiqeLab.ModelFile);

    [CommandOption("--block <PX>")]
    [Description("Block size in pixels (even, ≥ 8; default 32). Images smaller than one block are refused.")]
    public int Block { get; set; } = NiqeLab.BlockSize;
}

/// <summary>
/// <c>diffbir-lab weights fit-niqe</c>: fits the pristine model of NIQE (MATLAB estimatemodelparam) on a folder of HQ
/// images and writes it atomically. Exit 0 done, 2 bad input (the folder, an image or the block size).
/// </summary>
public sealed class FitNiqeCommand : Command<FitNiqeSettings>
{
    public override int Execute(CommandContext context, FitNiqeSettings s, CancellationToken ct)
    {
        if (s.Hq is null) throw new ArgumentException("--hq: give the folder of pristine images to fit on");
        if (!Directory.Exists(s.Hq)) throw new ArgumentException($"--hq: {s.Hq} is not a folder");
        if (s.Block < 8 || s.Block % 2 != 0) throw new ArgumentException($"--block: must be an even number ≥ 8 (got {s.Block})");
        var files = Directory.EnumerateFiles(s.Hq)
            .Where(f => MetricsTable.ImageExtensions.Contains(Path.GetExtension(f).ToLowerInvariant()))
            .OrderBy(f => f, StringComparer.Ordinal).ToList();
        if (files.Count == 0) throw new ArgumentException($"--hq: {s.Hq} holds no images ({string.Join(", ", MetricsTable.ImageExtensions)})");
        var greys = new List<double[,]>();
        foreach (var f in files)
        {
            ct.ThrowIfCancellationRequested();
            using var img = ImageIO.Load(f);
            if (img.Image.shape[2] < s.Block || img.Image.shape[3] < s.Block)
                throw new ArgumentException($"{f}: the image is {img.Image.shape[3]}×{img.Image.shape[2]}, smaller than one {s.Block}-px block");
            greys.Add(Niqe.GreyLevels(img.Image[0]));
        }
        var model = Niqe.Fit(greys, s.Block, $"{files.Count} images of {Path.GetFullPath(s.Hq)}");
        var dir = Path.GetDirectoryName(Path.GetFullPath(s.Output))!;
        if (!Directory.Exists(dir)) throw new ArgumentException($"-o: the folder {dir} does not exist");
        var tmp = s.Output + ".tmp";
        model.Save(tmp);
        File.Move(tmp, s.Output, overwrite: true);
        AnsiConsole.WriteLine($"NIQE model: {model.Blocks} sharp blocks of {model.Images} images, block {model.BlockSize} px → {s.Output}");
        return 0;
    }
}
