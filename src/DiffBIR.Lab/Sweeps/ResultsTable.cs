using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace DiffBIR.Lab.Sweeps;

/// <summary>
/// The results of a sweep in a folder: <c>results.jsonl</c> (one JSON object per point; the record) and
/// <c>results.csv</c> (the same rows as a table), both append-only. A row is appended as one whole line and flushed
/// to disk, so a process killed at any moment leaves at most a partial last line, which <see cref="Open"/> cuts off;
/// the CSV is rebuilt from the JSONL when the two disagree. A lock file keeps a second process out of the folder.
/// </summary>
public sealed class ResultsTable : IDisposable
{
    public const string JsonlName = "results.jsonl";
    public const string CsvName = "results.csv";
    const string LockName = ".sweep.lock";

    /// <summary>Columns that may differ between two runs of the same point: timing, where the files are (the point id
    /// already holds the input's bytes), and the manifest hash (it records paths, threads and library versions).</summary>
    public static readonly IReadOnlySet<string> Incidental = new HashSet<string>(StringComparer.Ordinal) { "index", "input", "hq", "seconds", "output", "manifest_sha256" };

    public string Folder { get; }
    public IReadOnlyList<string> Columns { get; }
    readonly List<JsonObject> _rows;
    readonly HashSet<string> _ids;
    readonly FileStream? _lock;

    public IReadOnlyList<JsonObject> Rows => _rows;
    public bool Contains(string pointId) => _ids.Contains(pointId);

    ResultsTable(string folder, IReadOnlyList<string> columns, List<JsonObject> rows, FileStream? lockFile)
    {
        Folder = folder; Columns = columns; _rows = rows; _lock = lockFile;
        _ids = new HashSet<string>(rows.Select(r => (string)r["point_id"]!), StringComparer.Ordinal);
    }

    /// <summary>
    /// Opens (or creates) the table in <paramref name="folder"/> for appending rows with <paramref name="columns"/>
    /// (the first must be point_id): a partial last line is cut off, finished rows are loaded (their ids are
    /// skipped by a rerun), and a table written with other columns is refused.
    /// </summary>
    public static ResultsTable Open(string folder, IReadOnlyList<string> columns)
    {
        if (columns.Count == 0 || columns[0] != "point_id") throw new ArgumentException("the first column must be point_id");
        Directory.CreateDirectory(folder);
        FileStream lockFile;
        try { lockFile = new FileStream(Path.Combine(folder, LockName), FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None); }
        catch (IOException) { throw new IOException($"{folder}: another sweep is writing to this folder (give each shard its own -o)"); }
        try
        {
            var jsonl = Path.Combine(folder, JsonlName);
            TruncatePartialLine(jsonl);
            var rows = ReadRows(jsonl);
            foreach (var r in rows.Take(1))
            {
                var keys = r.Select(kv => kv.Key).ToList();
                if (!keys.SequenceEqual(columns))
                    throw new InvalidDataException($"{jsonl}: was written with other columns ({string.Join(",", keys)}) than this sweep's ({string.Join(",", columns)}): use another output folder");
            }
            var csv = Path.Combine(folder, CsvName);
            TruncatePartialLine(csv);
            var header = CsvLine(columns);
            var csvLines = File.Exists(csv) ? File.ReadAllLines(csv) : Array.Empty<string>();
            if (csvLines.Length != rows.Count + 1 || csvLines[0] != header)
                AtomicFile.WriteAllText(csv, string.Join("", new[] { header }.Concat(rows.Select(r => CsvLine(columns.Select(c => SweepOptions.Text(r[c]))))).Select(l => l + "\n")));
            return new ResultsTable(folder, columns, rows, lockFile);
        }
        catch
        {
            lockFile.Dispose();
            throw;
        }
    }

    /// <summary>Appends one row (every column, point_id first): JSONL, then CSV, each as one flushed write.</summary>
    public void Append(JsonObject row)
    {
        var keys = row.Select(kv => kv.Key).ToList();
        if (!keys.SequenceEqual(Columns)) throw new ArgumentException($"row columns ({string.Join(",", keys)}) differ from the table's ({string.Join(",", Columns)})");
        var id = (string)row["point_id"]!;
        if (_ids.Contains(id)) throw new InvalidOperationException($"point {id} is already in {Folder}");
        AppendLine(Path.Combine(Folder, JsonlName), row.ToJsonString());
        AppendLine(Path.Combine(Folder, CsvName), CsvLine(Columns.Select(c => SweepOptions.Text(row[c]))));
        _rows.Add((JsonObject)row.DeepClone());
        _ids.Add(id);
    }

    static void AppendLine(string path, string line)
    {
        var bytes = Encoding.UTF8.GetBytes(line + "\n");
        using var fs = new FileStream(path, FileMode.Append, FileAccess.Write, FileShare.Read);
        fs.Write(bytes, 0, bytes.Length);
        fs.Flush(flushToDisk: true);
    }

    /// <summary>Cuts a file back to its last complete line (what a kill during an append leaves).</summary>
    static void TruncatePartialLine(string path)
    {
        if (!File.Exists(path)) return;
        using var fs = new FileStream(path, FileMode.Open, FileAccess.ReadWrite, FileShare.None);
        long len = fs.Length;
        if (len == 0) return;
        long pos = len;
        var one = new byte[1];
        while (pos > 0)
        {
            fs.Position = pos - 1;
            fs.ReadExactly(one, 0, 1);
            if (one[0] == (byte)'\n') break;
            pos--;
        }
        if (pos != len) { fs.SetLength(pos); fs.Flush(flushToDisk: true); }
    }

    /// <summary>The rows of a results.jsonl (complete lines only; a partial last line is ignored).</summary>
    public static List<JsonObject> ReadRows(string jsonl)
    {
        var rows = new List<JsonObject>();
        if (!File.Exists(jsonl)) return rows;
        var text = File.ReadAllText(jsonl);
        var lines = text.Split('\n');
        // the last element is "" after a final newline, or a partial line: never a finished row
        for (int i = 0; i < lines.Length - 1; i++)
        {
            if (lines[i].Length == 0) continue;
            JsonNode? node;
            try { node = JsonNode.Parse(lines[i]); }
            catch (JsonException e) { throw new InvalidDataException($"{jsonl}: line {i + 1} is not JSON ({e.Message.Split('.')[0]})"); }
            if (node is not JsonObject o || o["point_id"] is null) throw new InvalidDataException($"{jsonl}: line {i + 1} is not a results row (no point_id)");
            rows.Add(o);
        }
        return rows;
    }

    /// <summary>One CSV line (RFC 4180 quoting where needed).</summary>
    public static string CsvLine(IEnumerable<string> fields) => string.Join(",", fields.Select(f =>
        f.IndexOfAny(new[] { ',', '"', '\n', '\r' }) >= 0 ? "\"" + f.Replace("\"", "\"\"") + "\"" : f));

    /// <summary>
    /// Joins the tables of several sweep folders (shards) into <paramref name="outFolder"/>: one row per point id,
    /// ordered by point index; a point found twice must have the same values (apart from timing and file locations),
    /// else nothing is written and the conflict is named. Output paths are rewritten relative to the new folder.
    /// Returns the number of rows.
    /// </summary>
    public static int Merge(IReadOnlyList<string> folders, string outFolder)
    {
        if (folders.Count == 0) throw new ArgumentException("merge: give at least one sweep folder");
        IReadOnlyList<string>? columns = null;
        string? columnsFrom = null;
        var byId = new Dictionary<string, (JsonObject Row, string From)>(StringComparer.Ordinal);
        foreach (var folder in folders)
        {
            var jsonl = Path.Combine(folder, JsonlName);
            if (!File.Exists(jsonl)) throw new FileNotFoundException($"{folder}: no {JsonlName} (not a sweep output folder)", jsonl);
            foreach (var row in ReadRows(jsonl))
            {
                var keys = row.Select(kv => kv.Key).ToList();
                if (columns is null) { columns = keys; columnsFrom = folder; }
                else if (!keys.SequenceEqual(columns))
                    throw new InvalidDataException($"{folder}: its rows have other columns than those of {columnsFrom}: they are not shards of one sweep");
                var copy = (JsonObject)row.DeepClone();
                if (copy["output"] is JsonValue ov && ov.TryGetValue<string>(out var output) && output.Length > 0)
                    copy["output"] = Path.GetRelativePath(Path.GetFullPath(outFolder), Path.GetFullPath(Path.Combine(folder, output)));
                var id = (string)row["point_id"]!;
                if (byId.TryGetValue(id, out var prev))
                {
                    var differs = columns.Where(c => !Incidental.Contains(c) && prev.Row[c]?.ToJsonString() != copy[c]?.ToJsonString()).ToList();
                    if (differs.Count > 0)
                        throw new InvalidDataException($"point {id} is in {prev.From} and {folder} with different {string.Join(", ", differs.Take(3))} " +
                            $"({prev.Row[differs[0]]?.ToJsonString()} vs {copy[differs[0]]?.ToJsonString()}): not merged");
                    continue;
                }
                byId[id] = (copy, folder);
            }
        }
        var rows = byId.Values.Select(v => v.Row).OrderBy(r => (int?)r["index"] ?? int.MaxValue).ThenBy(r => (string)r["point_id"]!, StringComparer.Ordinal).ToList();
        columns ??= new[] { "point_id" };
        Directory.CreateDirectory(outFolder);
        AtomicFile.WriteAllText(Path.Combine(outFolder, JsonlName), string.Concat(rows.Select(r => r.ToJsonString() + "\n")));
        AtomicFile.WriteAllText(Path.Combine(outFolder, CsvName),
            string.Concat(new[] { CsvLine(columns) }.Concat(rows.Select(r => CsvLine(columns.Select(c => SweepOptions.Text(r[c]))))).Select(l => l + "\n")));
        return rows.Count;
    }

    public void Dispose()
    {
        if (_lock is null) return;
        _lock.Dispose();
        try { File.Delete(Path.Combine(Folder, LockName)); } catch (IOException) { }
    }
}
