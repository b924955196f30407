using System.ComponentModel;
using System.Globalization;
using System.Text.Json;
using DiffBIR.Lab.Checkpoints;
using DiffBIR.Lab.Cli.Notebooks;
using DiffBIR.Lab.IO;
using DiffBIR.Lab.Parity;
using Spectre.Console;
using Spectre.Console.Cli;

namespace DiffBIR.Lab.Cli
{
    static class CliErrors
    {
        /// <summary>Errors caused by the user's input: shown as one clear line, not a stack trace.</summary>
        public static bool IsUserError(Exception e) =>
            e is CheckpointException or ImageFileException or FileNotFoundException or DirectoryNotFoundException or UnauthorizedAccessException
            or ArgumentException or DiffBIR.Lab.Weights.WeightsFetchException or OperationCanceledException
            or DiffBIR.Lab.Pipeline.NonFiniteException or System.Text.Json.JsonException;

        /// <summary>The exception that says what happened (reflection and task wrappers removed).</summary>
        public static Exception Unwrap(Exception e)
        {
            while (e is System.Reflection.TargetInvocationException or AggregateException && e.InnerException is { } i) e = i;
            return e;
        }

        /// <summary>Spectre says "Failed to convert 'abc' to Int64."; name the option that was given that value.</summary>
        public static string NameOption(string message, string[] args)
        {
            var m = System.Text.RegularExpressions.Regex.Match(message, "^Failed to convert '(.*)' to (\\w+)");
            if (!m.Success) return message;
            int i = Array.IndexOf(args, m.Groups[1].Value);
            var type = m.Groups[2].Value;
            if (type.StartsWith("Nullable", StringComparison.Ordinal))       // int? / double? options: "Nullable`1[[System.Int32, …"
                type = System.Text.RegularExpressions.Regex.Match(message, @"System\.(Int32|Int64|Double|Single)").Groups[1].Value is { Length: > 0 } inner ? inner : "a valid value";
            string kind = type switch { "Int32" or "Int64" => "an integer", "Double" or "Single" => "a number", var t => t };
            return i > 0 && args[i - 1].StartsWith('-') ? $"{args[i - 1]}: '{m.Groups[1].Value}' is not {kind}" : $"'{m.Groups[1].Value}' is not {kind}";
        }

        static readonly IAnsiConsole Err = AnsiConsole.Create(new AnsiConsoleSettings { Out = new AnsiConsoleOutput(Console.Error) });

        /// <summary>One line on stderr: "error: …" (line breaks of the message folded, markup escaped).</summary>
        public static void Print(string message)
        {
            var line = string.Join(" ", message.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries));
            if (Console.IsErrorRedirected) Console.Error.WriteLine("error: " + line);
            else Err.MarkupLine($"[red]error:[/] {Markup.Escape(line)}");
        }
    }

    static class Fmt
    {
        public static string G(double x) => double.IsNaN(x) ? "-" : x.ToString("0.##e+0", CultureInfo.InvariantCulture);
        public static string Shape(IEnumerable<long> s) => "[" + string.Join(", ", s) + "]";
    }
}

namespace DiffBIR.Lab.Cli.Commands
{
    public sealed class ParitySettings : CommandSettings
    {
        [CommandArgument(0, "<PATH>")]
        [Description("Fixture files or folders (searched recursively).")]
        public string[] Paths { get; set; } = Array.Empty<string>();

        [CommandOption("--rtol <RTOL>")]
        [Description("Override the relative tolerance of every output (default: each case's band from the fixture README).")]
        public double? Rtol { get; set; }

        [CommandOption("--atol <ATOL>")]
        [Description("Override the absolute tolerance.")]
        public double? Atol { get; set; }

        [CommandOption("-v|--verbose")]
        [Description("Print every output, not only the failing ones.")]
        public bool Verbose { get; set; }

        [CommandOption("--json <FILE>")]
        [Description("Also write the report as JSON.")]
        public string? Json { get; set; }
    }

    /// <summary><c>diffbir-lab parity PATH…</c>: exit 0 only when every case is implemented and passes; 1 also when the paths hold no fixture.</summary>
    public sealed class ParityCommand : Command<ParitySettings>
    {
        public override int Execute(CommandContext context, ParitySettings s, CancellationToken cancellationToken)
        {
            foreach (var p in s.Paths)
                if (!File.Exists(p) && !Directory.Exists(p)) throw new FileNotFoundException($"{p}: no such file or folder");
            var files = ParityRunner.FindFixtures(s.Paths);
            if (!files.Any(Fixture.IsFixtureFile))
            {
                // Exit 1, not 0: a check that compared nothing must not read as a pass.
                CliErrors.Print($"nothing to check: {string.Join(", ", s.Paths)} holds no fixture (a *.safetensors fixture names its case in "
                                + "__metadata__[\"case\"]; also tokenizer.json, checkpoints/expected.json, schema/*.json)");
                return 1;
            }
            var tol = s.Rtol.HasValue || s.Atol.HasValue ? new Tolerance(s.Rtol ?? 0, s.Atol ?? 0) : null;
            var reports = Run(files, tol, s.Verbose, cancellationToken);
            if (s.Json != null) ParityReportJson.Write(s.Json, reports);
            return reports.All(r => r.Status == CaseStatus.Pass) ? 0 : 1;
        }

        internal static List<CaseReport> Run(IReadOnlyList<string> files, Tolerance? tol, bool verbose, CancellationToken ct)
        {
            var runner = ParityRunner.Default();
            var reports = new List<CaseReport>();
            foreach (var f in files)
            {
                ct.ThrowIfCancellationRequested();
                var r = runner.RunFile(f, tol);
                reports.Add(r);
                Print(r, verbose);
            }
            var table = new Table().Border(TableBorder.Simple).AddColumns("status", "count");
            foreach (var g in reports.GroupBy(r => r.Status).OrderBy(g => g.Key))
                table.AddRow(g.Key.ToString(), g.Count().ToString(CultureInfo.InvariantCulture));
            AnsiConsole.Write(table);
            AnsiConsole.WriteLine($"{reports.Count(r => r.Status == CaseStatus.Pass)} passed, {reports.Count(r => r.Status is CaseStatus.Fail or CaseStatus.Error)} failed, {reports.Count(r => r.Status == CaseStatus.NotImplemented)} not implemented");
            return reports;
        }

        static void Print(CaseReport r, bool verbose)
        {
            var color = r.Status switch { CaseStatus.Pass => "green", CaseStatus.NotImplemented => "yellow", _ => "red" };
            var label = r.Status switch { CaseStatus.Pass => "PASS", CaseStatus.Fail => "FAIL", CaseStatus.Error => "ERROR", _ => "NOT IMPLEMENTED" };
            // max_rel of an output judged by an absolute band only is noise over noise: reported apart
            var worst = r.Outputs.Count == 0 ? ""
                : $" outputs={r.Outputs.Count} worst max_rel={Fmt.G(r.WorstRelBanded)}"
                  + (r.WorstRelAbsoluteBand is var a && !double.IsNaN(a) && !(a <= r.WorstRelBanded) ? $" (absolute-band outputs: {Fmt.G(a)})" : "");
            AnsiConsole.MarkupLine($"[{color}]{label,-15}[/] {Markup.Escape(r.Case),-22} {Markup.Escape(Path.GetFileName(r.File))}{worst} ({r.Elapsed.TotalSeconds:F1}s)");
            if (r.Message != null && r.Status != CaseStatus.NotImplemented) AnsiConsole.MarkupLine($"    {Markup.Escape(r.Message)}");
            foreach (var o in r.Outputs.Where(o => verbose || !o.Pass))
                AnsiConsole.MarkupLine($"    {(o.Pass ? "[green]pass[/]" : "[red]FAIL[/]")} {Markup.Escape(o.Name),-44} max_abs={Fmt.G(o.MaxAbs)} max_rel={Fmt.G(o.MaxRel)} ({o.Tolerance}){(o.Note != null ? " " + Markup.Escape(o.Note) : "")}");
        }
    }

    static class ParityReportJson
    {
        public static void Write(string path, IEnumerable<CaseReport> reports)
        {
            static double? N(double x) => double.IsFinite(x) ? x : null;
            var doc = reports.Select(r => new
            {
                file = r.File, @case = r.Case, status = r.Status.ToString(), message = r.Message, seconds = r.Elapsed.TotalSeconds,
                outputs = r.Outputs.Select(o => new { name = o.Name, max_abs = N(o.MaxAbs), max_rel = N(o.MaxRel), rtol = o.Tolerance.Rtol, atol = o.Tolerance.Atol, pass = o.Pass, note = o.Note }),
            });
            AtomicFile.WriteAllText(path, JsonSerializer.Serialize(doc, new JsonSerializerOptions { WriteIndented = true }));
        }
    }

    public sealed class WeightsInspectSettings : CommandSettings
    {
        [CommandArgument(0, "<FILE>")]
        [Description("A .safetensors, .pth, .pt or .ckpt file.")]
        public string File { get; set; } = "";

        [CommandOption("--raw")]
        [Description("Do not unwrap 'state_dict' / 'params_ema' or strip 'module.'.")]
        public bool Raw { get; set; }

        [CommandOption("--limit <N>")]
        [Description("Show at most N tensors (default: all).")]
        public int? Limit { get; set; }
    }

    /// <summary><c>diffbir-lab weights inspect FILE</c>.</summary>
    public sealed class WeightsInspectCommand : Command<WeightsInspectSettings>
    {
        public override int Execute(CommandContext context, WeightsInspectSettings s, CancellationToken cancellationToken)
        {
            using var sd = Checkpoint.Load(s.File, unwrap: !s.Raw, stripModulePrefix: !s.Raw);
            var table = new Table().Border(TableBorder.Simple).AddColumns("name", "dtype", "shape", "count");
            long total = 0;
            foreach (var (k, t) in sd.Tensors.Take(s.Limit ?? int.MaxValue))
                table.AddRow(Markup.Escape(k), t.dtype.ToString(), Markup.Escape(Fmt.Shape(t.shape)), t.numel().ToString("N0", CultureInfo.InvariantCulture));
            foreach (var t in sd.Tensors.Values) total += t.numel();
            AnsiConsole.MarkupLine($"[bold]{Markup.Escape(s.File)}[/] ({sd.Format})");
            AnsiConsole.Write(table);
            AnsiConsole.MarkupLine($"{sd.Count} tensors, {total.ToString("N0", CultureInfo.InvariantCulture)} values");
            foreach (var (k, v) in sd.Metadata)
                AnsiConsole.MarkupLine($"metadata [blue]{Markup.Escape(k)}[/] = {Markup.Escape(v.Length > 200 ? v[..200] + "…" : v)}");
            foreach (var n in sd.Notes) AnsiConsole.MarkupLine($"note: {Markup.Escape(n)}");
            return 0;
        }
    }

    public class WeightsListSettings : CommandSettings
    {
        [CommandOption("--weights <DIR>")]
        [Description("The weights folder (default weights/).")]
        public string Weights { get; set; } = "weights";

        [CommandOption("--manifest <FILE>")]
        [Description("The manifest (default weights/manifest.json).")]
        public string? Manifest { get; set; }
    }

    /// <summary><c>diffbir-lab weights list</c>: the official files, where they come from, and which are present.</summary>
    public sealed class WeightsListCommand : Command<WeightsListSettings>
    {
        public override int Execute(CommandContext context, WeightsListSettings s, CancellationToken cancellationToken)
        {
            var m = DiffBIR.Lab.Weights.WeightsManifest.Load(s.Manifest ?? Path.Combine(s.Weights, "manifest.json"));
            var table = new Table().Border(TableBorder.Simple).AddColumns("id", "file", "state", "loads into", "url");
            foreach (var f in m.Files)
            {
                var path = Path.Combine(s.Weights, f.File);
                var state = File.Exists(path) ? $"[green]present[/] ({new FileInfo(path).Length:N0} B)" : "[yellow]missing[/]";
                table.AddRow(Markup.Escape(f.Id), Markup.Escape(f.File), state, Markup.Escape(f.LoadsInto), Markup.Escape(f.Url));
            }
            AnsiConsole.Write(table);
            foreach (var (preset, _) in m.Presets)
                foreach (var task in new[] { "sr", "face", "denoise" })
                {
                    var missing = m.Missing(s.Weights, preset, task);
                    AnsiConsole.MarkupLine($"{preset,-5} {task,-8} " + (missing.Count == 0 ? "[green]complete[/]" : $"missing {Markup.Escape(string.Join(", ", missing.Select(x => x.File)))}"));
                }
            foreach (var n in DiffBIR.Lab.Metrics.Metric.Names)
            {
                var (ok, reason) = DiffBIR.Lab.Metrics.Metric.Availability(n, s.Weights);
                AnsiConsole.MarkupLine($"metric {Markup.Escape(n),-10} " + (ok ? "[green]available[/]" : Markup.Escape(reason)));
            }
            return 0;
        }
    }

    public sealed class WeightsFetchSettings : WeightsListSettings
    {
        [CommandArgument(0, "<PRESET>")]
        [Description("v1, v2 or v2.1; or 'metrics' for the image-quality metrics' files.")]
        public string Preset { get; set; } = "";

        [CommandOption("--metrics <NAMES>")]
        [Description("With 'metrics': which metrics, comma-separated (default all: psnr,ssim need none).")]
        public string? Metrics { get; set; }

        [CommandOption("--task <TASK>")]
        [Description("sr, face, denoise, or all (default all).")]
        public string Task { get; set; } = "all";
    }

    /// <summary><c>diffbir-lab weights fetch PRESET</c>: download with progress, resume and SHA-256 checks.</summary>
    public sealed class WeightsFetchCommand : AsyncCommand<WeightsFetchSettings>
    {
        public override async Task<int> ExecuteAsync(CommandContext context, WeightsFetchSettings s, CancellationToken ct)
        {
            var m = DiffBIR.Lab.Weights.WeightsManifest.Load(s.Manifest ?? Path.Combine(s.Weights, "manifest.json"));
            List<DiffBIR.Lab.Weights.WeightFile> files;
            if (s.Preset == "metrics")
            {
                var names = s.Metrics is { } list ? list.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries) : DiffBIR.Lab.Metrics.Metric.Names.ToArray();
                files = names.SelectMany(n => DiffBIR.Lab.Metrics.Metric.Describe(n).Weights).Select(w => m[w.Id]).DistinctBy(f => f.Id).ToList();
            }
            else
            {
                var tasks = s.Task == "all" ? new[] { "sr", "face", "denoise" } : new[] { s.Task };
                files = tasks.SelectMany(t => m.FilesFor(s.Preset, t)).DistinctBy(f => f.Id).ToList();
            }
            var fetcher = new DiffBIR.Lab.Weights.WeightsFetcher(s.Weights);
            int failed = 0;
            await AnsiConsole.Progress().AutoClear(false)
                .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new DownloadedColumn(), new TransferSpeedColumn(), new RemainingTimeColumn())
                .StartAsync(async pctx =>
                {
                    foreach (var f in files)
                    {
                        var task = pctx.AddTask(Markup.Escape(f.File), maxValue: f.SizeBytes ?? 1);
                        try
                        {
                            var r = await fetcher.FetchAsync(f, new Progress<DiffBIR.Lab.Weights.FetchProgress>(p =>
                            {
                                if (p.Total is long t) task.MaxValue = t;
                                task.Value = p.Bytes;
                            }), ct);
                            task.MaxValue = Math.Max(1, r.Bytes); task.Value = task.MaxValue;
                            task.Description = Markup.Escape(f.File) + (r.AlreadyPresent ? " [grey](present)[/]" : r.Resumed ? " [green](resumed)[/]" : "");
                        }
                        catch (DiffBIR.Lab.Weights.WeightsFetchException e)
                        {
                            failed++;
                            task.StopTask();
                            CliErrors.Print(e.Message);
                        }
                    }
                });
            if (s.Preset == "metrics")
                foreach (var n in DiffBIR.Lab.Metrics.Metric.Names)
                    if (s.Metrics is null || s.Metrics.Split(',').Select(x => x.Trim()).Contains(n))
                    {
                        var (ok, reason) = DiffBIR.Lab.Metrics.Metric.Availability(n, s.Weights);
                        if (!ok) AnsiConsole.WriteLine($"{n}: {reason}");
                    }
            return failed == 0 ? 0 : 2;
        }
    }

    public sealed class NotebooksRunSettings : CommandSettings
    {
        [CommandArgument(0, "<PATH>")]
        [Description("Notebooks (.ipynb) or folders of them.")]
        public string[] Paths { get; set; } = Array.Empty<string>();

        [CommandOption("-o|--output <DIR>")]
        [Description("Write each executed notebook (with outputs) into DIR.")]
        public string? Output { get; set; }

        [CommandOption("--cell-timeout <SECONDS>")]
        [Description("Give up on a cell after this long (default 600).")]
        public int CellTimeout { get; set; } = 600;
    }

    /// <summary><c>diffbir-lab notebooks run PATH…</c>: exit 1 at the first failing cell of any notebook.</summary>
    public sealed class NotebooksRunCommand : Command<NotebooksRunSettings>
    {
        public override int Execute(CommandContext context, NotebooksRunSettings s, CancellationToken cancellationToken)
        {
            var files = s.Paths.SelectMany(p => Directory.Exists(p)
                ? Directory.EnumerateFiles(p, "*.ipynb").OrderBy(x => x, StringComparer.Ordinal).ToArray()
                : File.Exists(p) ? new[] { p } : throw new FileNotFoundException($"{p}: no such notebook or folder")).ToList();
            if (files.Count == 0) { CliErrors.Print($"{string.Join(", ", s.Paths)}: nothing to run (no *.ipynb)"); return 2; }
            int failed = 0;
            foreach (var f in files)
            {
                AnsiConsole.MarkupLine($"[bold]{Markup.Escape(f)}[/]");
                var result = NotebookRunner.Run(f, new NotebookRunOptions
                {
                    CellTimeout = TimeSpan.FromSeconds(s.CellTimeout),
                    OutputPath = s.Output == null ? null : Path.Combine(s.Output, Path.GetFileName(f)),
                    Log = line => AnsiConsole.MarkupLine(Markup.Escape(line)),
                }, cancellationToken);
                if (result.Succeeded)
                    AnsiConsole.MarkupLine($"[green]ok[/] {result.CellsRun} cells in {result.Elapsed.TotalSeconds:F1}s");
                else
                {
                    failed++;
                    AnsiConsole.MarkupLine($"[red]FAILED[/] at cell {result.FailedCell} (of {result.CodeCells} code cells): {Markup.Escape(result.Error ?? "")}");
                }
            }
            AnsiConsole.WriteLine($"{files.Count - failed} passed, {failed} failed");
            return failed == 0 ? 0 : 1;
        }
    }
}
