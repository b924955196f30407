using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;

namespace DiffBIR.Lab.Cli.Commands;

/// <summary>
/// The process's memory as Linux and glibc see it, for the bench commands: resident set (VmRSS), its high-water mark
/// (VmHWM, which <see cref="ResetPeak"/> restarts by writing 5 to /proc/self/clear_refs, so a peak can be taken per
/// stage), and glibc's malloc statistics (mallinfo2: bytes in use, bytes freed but kept by the allocator). Outside
/// Linux/glibc the methods fall back to .NET's working set or return null.
/// </summary>
static class ProcessMemory
{
    public static long Rss() => StatusKb("VmRSS:") ?? Environment.WorkingSet;

    public static long PeakRss() => StatusKb("VmHWM:") ?? Process.GetCurrentProcess().PeakWorkingSet64;

    /// <summary>Restarts the VmHWM high-water mark at the current RSS; false where the kernel does not allow it.</summary>
    public static bool ResetPeak()
    {
        try { File.WriteAllText("/proc/self/clear_refs", "5"); return true; }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or NotSupportedException) { return false; }
    }

    /// <summary>A field of /proc/self/status in bytes (Linux); null elsewhere.</summary>
    static long? StatusKb(string field)
    {
        try
        {
            foreach (var line in File.ReadLines("/proc/self/status"))
                if (line.StartsWith(field, StringComparison.Ordinal))
                    return long.Parse(line[field.Length..].Trim().Split(' ')[0], CultureInfo.InvariantCulture) * 1024;
        }
        catch (IOException) { }
        catch (UnauthorizedAccessException) { }
        return null;
    }

    [StructLayout(LayoutKind.Sequential)]
    struct MallInfo2
    {
        public nuint arena, ordblks, smblks, hblks, hblkhd, usmblks, fsmblks, uordblks, fordblks, keepcost;
    }

    [DllImport("libc", EntryPoint = "mallinfo2")] static extern MallInfo2 mallinfo2();

    /// <summary>glibc heap: bytes handed out (heap + mmapped chunks) and bytes free inside the heap; null without glibc ≥ 2.33.</summary>
    public static (long InUse, long FreeInHeap, long Mmapped)? Malloc()
    {
        try
        {
            var m = mallinfo2();
            return ((long)(m.uordblks + m.hblkhd), (long)m.fordblks, (long)m.hblkhd);
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException) { return null; }
    }

    public static string GiB(long bytes) => (bytes / (1024.0 * 1024 * 1024)).ToString("0.00", CultureInfo.InvariantCulture) + " GiB";
}
