using System.Collections.Concurrent;
using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace DiffBIR.Lab.Cli.Notebooks;

public sealed record NotebookRunOptions
{
    /// <summary>Give up on a cell after this long (the first <c>#r "nuget:"</c> cell can take a minute on a cold cache).</summary>
    public TimeSpan CellTimeout { get; init; } = TimeSpan.FromMinutes(10);
    /// <summary>Where to write the executed notebook (with outputs); null = don't write.</summary>
    public string? OutputPath { get; init; }
    /// <summary>The folder holding dotnet-tools.json (found upwards from the notebook when null).</summary>
    public string? ToolRoot { get; init; }
    public Action<string>? Log { get; init; }
}

public sealed record NotebookRunResult(string Path, int CodeCells, int CellsRun, int? FailedCell, string? Error, TimeSpan Elapsed)
{
    public bool Succeeded => FailedCell == null && Error == null;
}

/// <summary>
/// Executes a .NET Interactive (Polyglot) notebook headlessly: starts <c>dotnet-interactive stdio</c> (the local
/// tool pinned in dotnet-tools.json), submits the code cells in order as JSON commands, collects their outputs and
/// stops at the first cell that fails, reporting its number (1-based, counting code cells) and error. The kernel's
/// working directory is the notebook's folder, as in the editor. The whole process tree is killed at the end.
/// </summary>
public static class NotebookRunner
{
    public static NotebookRunResult Run(string notebookPath, NotebookRunOptions? options = null, CancellationToken ct = default)
    {
        var o = options ?? new NotebookRunOptions();
        var sw = Stopwatch.StartNew();
        var full = Path.GetFullPath(notebookPath);
        if (!File.Exists(full)) return new NotebookRunResult(notebookPath, 0, 0, null, "notebook not found", sw.Elapsed);
        JsonObject nb;
        try { nb = JsonNode.Parse(File.ReadAllText(full))!.AsObject(); }
        catch (Exception e) when (e is JsonException or InvalidOperationException)
        { return new NotebookRunResult(notebookPath, 0, 0, null, $"not a valid .ipynb file: {e.Message}", sw.Elapsed); }

        var defaultKernel = (string?)nb["metadata"]?["polyglot_notebook"]?["kernelInfo"]?["defaultKernelName"]
                            ?? (string?)nb["metadata"]?["polyglot_notebook"]?["defaultKernelName"]
                            ?? ((string?)nb["metadata"]?["kernelspec"]?["language"])?.Replace("F#", "fsharp").Replace("C#", "csharp")
                            ?? "fsharp";
        var cells = nb["cells"]?.AsArray() ?? new JsonArray();
        var codeCells = cells.OfType<JsonObject>().Where(c => (string?)c["cell_type"] == "code").ToList();

        var root = o.ToolRoot ?? FindToolRoot(Path.GetDirectoryName(full)!) ?? Directory.GetCurrentDirectory();
        var psi = new ProcessStartInfo("dotnet")
        {
            WorkingDirectory = root,
            RedirectStandardInput = true, RedirectStandardOutput = true, RedirectStandardError = true,
            UseShellExecute = false,
        };
        foreach (var a in new[] { "dotnet-interactive", "stdio", "--default-kernel", defaultKernel, "--working-dir", Path.GetDirectoryName(full)! })
            psi.ArgumentList.Add(a);
        psi.Environment["DOTNET_INTERACTIVE_CLI_TELEMETRY_OPTOUT"] = "1";
        psi.Environment["DOTNET_CLI_TELEMETRY_OPTOUT"] = "1";

        using var proc = Process.Start(psi) ?? throw new InvalidOperationException("could not start dotnet-interactive");
        var lines = new BlockingCollection<string>();
        var stderr = new ConcurrentQueue<string>();
        var reader = new Thread(() =>
        {
            try { string? l; while ((l = proc.StandardOutput.ReadLine()) != null) lines.Add(l); }
            catch (Exception) { /* the process went away */ }
            finally { lines.CompleteAdding(); }
        }) { IsBackground = true };
        reader.Start();
        proc.ErrorDataReceived += (_, e) => { if (e.Data != null) stderr.Enqueue(e.Data); };
        proc.BeginErrorReadLine();

        int run = 0;
        try
        {
            for (int i = 0; i < codeCells.Count; i++)
            {
                var cell = codeCells[i];
                var code = CellSource(cell);
                var kernel = (string?)cell["metadata"]?["polyglot_notebook"]?["kernelName"]
                             ?? (string?)cell["metadata"]?["dotnet_interactive"]?["language"] ?? defaultKernel;
                cell["outputs"] = new JsonArray();
                if (string.IsNullOrWhiteSpace(code)) { run++; continue; }
                var token = $"cell-{i + 1}-{Guid.NewGuid():N}";
                var cmd = new JsonObject
                {
                    ["token"] = token, ["commandType"] = "SubmitCode",
                    ["command"] = new JsonObject { ["code"] = code, ["targetKernelName"] = kernel },
                };
                proc.StandardInput.WriteLine(cmd.ToJsonString());
                proc.StandardInput.Flush();
                o.Log?.Invoke($"  cell {i + 1}/{codeCells.Count} ({kernel})");
                var (ok, error) = Collect(lines, token, cell, o.CellTimeout, ct);
                run++;
                cell["execution_count"] = run;
                if (!ok)
                {
                    if (error == null && proc.HasExited) error = "the kernel exited: " + string.Join(" | ", stderr.TakeLast(5));
                    Write(o.OutputPath, nb);
                    return new NotebookRunResult(notebookPath, codeCells.Count, run, i + 1, error ?? "failed", sw.Elapsed);
                }
            }
            Write(o.OutputPath, nb);
            return new NotebookRunResult(notebookPath, codeCells.Count, run, null, null, sw.Elapsed);
        }
        finally
        {
            try { proc.StandardInput.Close(); } catch (IOException) { }
            try { if (!proc.HasExited) proc.Kill(entireProcessTree: true); } catch (InvalidOperationException) { }
            proc.WaitForExit(5000);
        }
    }

    static string? FindToolRoot(string dir)
    {
        for (var d = new DirectoryInfo(dir); d != null; d = d.Parent)
            if (File.Exists(Path.Combine(d.FullName, "dotnet-tools.json")) || File.Exists(Path.Combine(d.FullName, ".config", "dotnet-tools.json")))
                return d.FullName;
        return null;
    }

    static string CellSource(JsonObject cell) => cell["source"] switch
    {
        JsonArray a => string.Concat(a.Select(x => (string?)x ?? "")),
        JsonValue v => (string?)v ?? "",
        _ => "",
    };

    /// <summary>Reads kernel events until the command with <paramref name="token"/> completes; records outputs on the cell.</summary>
    static (bool Ok, string? Error) Collect(BlockingCollection<string> lines, string token, JsonObject cell, TimeSpan timeout, CancellationToken ct)
    {
        var deadline = DateTime.UtcNow + timeout;
        var outputs = cell["outputs"]!.AsArray();
        string? lastError = null;
        while (true)
        {
            var left = deadline - DateTime.UtcNow;
            if (left <= TimeSpan.Zero) return (false, $"timed out after {timeout.TotalSeconds:F0}s");
            string? line;
            try
            {
                if (!lines.TryTake(out line, (int)Math.Min(int.MaxValue, left.TotalMilliseconds), ct))
                    return lines.IsCompleted ? (false, null) : (false, $"timed out after {timeout.TotalSeconds:F0}s");
            }
            catch (OperationCanceledException) { return (false, "cancelled"); }
            if (line.Length == 0 || line[0] != '{') continue; // the first start prints a banner
            JsonObject e;
            try { e = JsonNode.Parse(line)!.AsObject(); } catch (JsonException) { continue; }
            var cmdToken = (string?)e["command"]?["token"];
            if (cmdToken == null || !(cmdToken == token || cmdToken.StartsWith(token + ".", StringComparison.Ordinal))) continue;
            var type = (string?)e["eventType"];
            var ev = e["event"];
            switch (type)
            {
                case "CommandSucceeded" when cmdToken == token:
                    return (true, null);
                case "CommandFailed" when cmdToken == token:
                {
                    var msg = (string?)ev?["message"] ?? lastError ?? "failed";
                    outputs.Add(new JsonObject { ["output_type"] = "error", ["ename"] = "Error", ["evalue"] = msg, ["traceback"] = new JsonArray() });
                    return (false, msg);
                }
                case "StandardOutputValueProduced":
                case "StandardErrorValueProduced":
                {
                    // stdout arrives in fragments: merge consecutive fragments of one stream into one output.
                    var name = type.StartsWith("StandardError") ? "stderr" : "stdout";
                    var text = Formatted(ev).FirstOrDefault().Value ?? "";
                    if (outputs.Count > 0 && outputs[^1] is JsonObject last && (string?)last["output_type"] == "stream" && (string?)last["name"] == name)
                        last["text"] = new JsonArray(string.Concat(last["text"]!.AsArray().Select(x => (string?)x)) + text);
                    else
                        outputs.Add(new JsonObject { ["output_type"] = "stream", ["name"] = name, ["text"] = new JsonArray(text) });
                    if (name == "stderr") lastError = text;
                    break;
                }
                case "DisplayedValueProduced":
                case "DisplayedValueUpdated":
                case "ReturnValueProduced":
                {
                    var data = new JsonObject();
                    foreach (var (mime, value) in Formatted(ev)) data[mime] = value;
                    outputs.Add(new JsonObject
                    {
                        ["output_type"] = type == "ReturnValueProduced" ? "execute_result" : "display_data",
                        ["data"] = data, ["metadata"] = new JsonObject(),
                    });
                    break;
                }
                case "ErrorProduced":
                    lastError = (string?)ev?["message"];
                    break;
            }
        }
    }

    static IEnumerable<(string Mime, string? Value)> Formatted(JsonNode? ev) =>
        (ev?["formattedValues"] as JsonArray ?? new JsonArray()).OfType<JsonObject>().Select(f => ((string?)f["mimeType"] ?? "text/plain", (string?)f["value"]));

    static void Write(string? path, JsonObject nb)
    {
        if (path == null) return;
        AtomicFile.WriteAllText(path, nb.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
    }

    /// <summary>True when any cell holds outputs or an execution count (git should hold cleared notebooks).</summary>
    public static bool HasOutputs(string notebookPath)
    {
        var nb = JsonNode.Parse(File.ReadAllText(notebookPath))!.AsObject();
        return (nb["cells"]?.AsArray() ?? new JsonArray()).OfType<JsonObject>().Any(c =>
            (c["outputs"] is JsonArray a && a.Count > 0) || (c["execution_count"] is JsonValue v && v.GetValueKind() == JsonValueKind.Number));
    }
}
