namespace DiffBIR.Lab;

/// <summary>
/// Writes files so that readers never see a half-written one: the content goes to a temporary file in the target's
/// folder, is flushed to disk, and is then renamed over the target (rename is atomic within one file system).
/// </summary>
public static class AtomicFile
{
    public static void Write(string path, Action<FileStream> write)
    {
        var full = Path.GetFullPath(path);
        var dir = Path.GetDirectoryName(full)!;
        Directory.CreateDirectory(dir);
        var tmp = Path.Combine(dir, $".{Path.GetFileName(full)}.{Environment.ProcessId}.{Guid.NewGuid():N}.tmp");
        try
        {
            using (var fs = new FileStream(tmp, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1 << 20))
            {
                write(fs);
                fs.Flush(flushToDisk: true);
            }
            File.Move(tmp, full, overwrite: true);
        }
        catch
        {
            try { File.Delete(tmp); } catch { /* best effort: the temp name is hidden and unique */ }
            throw;
        }
    }

    public static void WriteAllText(string path, string text) =>
        Write(path, fs => { using var w = new StreamWriter(fs, new System.Text.UTF8Encoding(false), leaveOpen: true); w.Write(text); });
}
