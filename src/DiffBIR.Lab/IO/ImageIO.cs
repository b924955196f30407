using SixLabors.ImageSharp;
using SixLabors.ImageSharp.Formats;
using SixLabors.ImageSharp.Formats.Bmp;
using SixLabors.ImageSharp.Formats.Jpeg;
using SixLabors.ImageSharp.Formats.Png;
using SixLabors.ImageSharp.Formats.Tiff;
using SixLabors.ImageSharp.Formats.Webp;
using SixLabors.ImageSharp.Memory;
using SixLabors.ImageSharp.PixelFormats;
using SixLabors.ImageSharp.Processing;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.IO;

/// <summary>How float pixels in [0,1] become 8-bit levels.</summary>
public enum Quantization
{
    /// <summary><c>(x*255).clamp(0,255).to(uint8)</c>: truncation, as the official pipelines do (the default).</summary>
    Truncate,
    /// <summary><c>(x*255).round().clamp(0,255)</c>: nearest level (what most image tools do).</summary>
    Round,
}

/// <summary>Limits checked from the file header before any pixel is decoded.</summary>
public sealed record ImageLoadOptions
{
    public int MaxSide { get; init; } = 16384;
    public double MaxMegapixels { get; init; } = 100;
    public static ImageLoadOptions Default { get; } = new();
}

/// <summary>What a loaded image was: format, size, bit depth, and notices (alpha dropped, orientation applied…).</summary>
public sealed record ImageInfo(string Path, string Format, int Width, int Height, int BitDepth, bool HadAlpha, IReadOnlyList<string> Notices);

/// <summary>A decoded image: float32 [1,3,H,W] RGB in [0,1], and what the file was. Dispose to free the tensor.</summary>
public sealed class LoadedImage : IDisposable
{
    public Tensor Image { get; }
    public ImageInfo Info { get; }
    public LoadedImage(Tensor image, ImageInfo info) { Image = image; Info = info; }
    public void Deconstruct(out Tensor image, out ImageInfo info) { image = Image; info = Info; }
    public void Dispose() => Image.Dispose();
}

/// <summary>Header facts read without decoding pixels.</summary>
public sealed record ImageHeader(string Format, int Width, int Height, int BitsPerPixel);

/// <summary>An image could not be read or written; the message names the file and the cause.</summary>
public sealed class ImageFileException : Exception
{
    public string FilePath { get; }
    public ImageFileException(string path, string cause, Exception? inner = null) : base($"{path}: {cause}", inner) => FilePath = path;
}

/// <summary>
/// Image files in and out (ImageSharp 2.1.13). In: PNG, JPEG, BMP, TIFF, WebP; 8 or 16 bits; greyscale becomes RGB,
/// alpha is dropped (with a notice), EXIF orientation is applied. Out: PNG or JPEG, written atomically.
/// Tensors are float32 NCHW RGB in [0,1].
/// </summary>
public static class ImageIO
{
    static readonly string[] ReadFormats = { "PNG", "JPEG", "BMP", "TIFF", "WEBP" };

    static Configuration MakeConfiguration(ImageLoadOptions o)
    {
        var c = new Configuration(new PngConfigurationModule(), new JpegConfigurationModule(), new BmpConfigurationModule(),
            new TiffConfigurationModule(), new WebpConfigurationModule());
        // Backstop for headers that lie: refuse allocations past what the limits allow (RGBA64 = 8 bytes a pixel).
        int limitMb = (int)Math.Clamp(o.MaxMegapixels * 8 * 2 + 64, 64, int.MaxValue);
        c.MemoryAllocator = MemoryAllocator.Create(new MemoryAllocatorOptions { AllocationLimitMegabytes = limitMb });
        return c;
    }

    /// <summary>Reads only the header: format and size (no pixels decoded).</summary>
    public static ImageHeader Identify(string path, ImageLoadOptions? options = null)
    {
        var o = options ?? ImageLoadOptions.Default;
        var cfg = MakeConfiguration(o);
        var bytes = ReadAll(path);
        return IdentifyBytes(path, bytes, cfg, o);
    }

    static byte[] ReadAll(string path)
    {
        if (!File.Exists(path)) throw new ImageFileException(path, "file not found");
        var len = new FileInfo(path).Length;
        if (len == 0) throw new ImageFileException(path, "file is empty (0 bytes)");
        if (len > int.MaxValue) throw new ImageFileException(path, $"file is too large ({len} bytes)");
        return File.ReadAllBytes(path);
    }

    static ImageHeader IdentifyBytes(string path, byte[] bytes, Configuration cfg, ImageLoadOptions o)
    {
        IImageInfo? info;
        IImageFormat? fmt;
        try
        {
            using var ms = new MemoryStream(bytes, writable: false);
            info = Image.Identify(cfg, ms, out fmt);
        }
        catch (UnknownImageFormatException) { info = null; fmt = null; }
        catch (Exception e) when (e is InvalidImageContentException or ImageFormatException or InvalidDataException or IndexOutOfRangeException or ArgumentException or EndOfStreamException)
        { throw new ImageFileException(path, $"corrupt image header: {e.Message}", e); }
        if (info == null || fmt == null)
            throw new ImageFileException(path, $"unsupported or unrecognised image format (supported: {string.Join(", ", ReadFormats)})");
        if (info.Width <= 0 || info.Height <= 0) throw new ImageFileException(path, $"image has no pixels ({info.Width}×{info.Height})");
        if (info.Width > o.MaxSide || info.Height > o.MaxSide)
            throw new ImageFileException(path, $"image is {info.Width}×{info.Height}, over the limit of {o.MaxSide} px a side (ImageLoadOptions.MaxSide)");
        double mp = (double)info.Width * info.Height / 1e6;
        if (mp > o.MaxMegapixels)
            throw new ImageFileException(path, $"image is {mp:F1} MP, over the limit of {o.MaxMegapixels} MP (ImageLoadOptions.MaxMegapixels)");
        return new ImageHeader(fmt.Name.ToUpperInvariant(), info.Width, info.Height, info.PixelType?.BitsPerPixel ?? 0);
    }

    /// <summary>Loads an image as float32 [1,3,H,W] RGB in [0,1] (8-bit: v/255, 16-bit: v/65535).</summary>
    public static LoadedImage Load(string path, ImageLoadOptions? options = null)
    {
        var o = options ?? ImageLoadOptions.Default;
        var cfg = MakeConfiguration(o);
        var bytes = ReadAll(path);
        var header = IdentifyBytes(path, bytes, cfg, o);
        string format = header.Format; int bpp = header.BitsPerPixel;
        CheckComplete(path, format, bytes);
        Image<Rgba64> img;
        try
        {
            using var ms = new MemoryStream(bytes, writable: false);
            img = Image.Load<Rgba64>(cfg, ms);
        }
        catch (Exception e) when (e is InvalidImageContentException or ImageFormatException or UnknownImageFormatException or InvalidDataException
                                      or IndexOutOfRangeException or ArgumentException or EndOfStreamException or InvalidMemoryOperationException)
        { throw new ImageFileException(path, $"corrupt or truncated image: {e.Message}", e); }

        using (img)
        {
            var notices = new List<string>();
            int bitDepth = BitDepth(img, format, bpp);
            var orientation = img.Metadata.ExifProfile?.GetValue(SixLabors.ImageSharp.Metadata.Profiles.Exif.ExifTag.Orientation)?.Value;
            if (orientation is > 1 and <= 8)
            {
                img.Mutate(x => x.AutoOrient());
                notices.Add($"EXIF orientation {orientation} applied");
            }
            bool declaredAlpha = format == "PNG" && img.Metadata.GetPngMetadata().ColorType is PngColorType.RgbWithAlpha or PngColorType.GrayscaleWithAlpha;
            int w = img.Width, h = img.Height;
            var pixels = new Rgba64[w * h];
            img.CopyPixelDataTo(pixels);
            var data = new float[3 * w * h];
            bool anyTransparent = false;
            int plane = w * h;
            if (bitDepth <= 8)
            {
                // Decoded 8-bit values are v*257 in Rgba64; v/255 is exact in float32 like the official uint8/255.
                for (int i = 0; i < plane; i++)
                {
                    var p = pixels[i];
                    data[i] = (p.R >> 8) / 255f; data[plane + i] = (p.G >> 8) / 255f; data[2 * plane + i] = (p.B >> 8) / 255f;
                    anyTransparent |= p.A != ushort.MaxValue;
                }
            }
            else
            {
                for (int i = 0; i < plane; i++)
                {
                    var p = pixels[i];
                    data[i] = p.R / 65535f; data[plane + i] = p.G / 65535f; data[2 * plane + i] = p.B / 65535f;
                    anyTransparent |= p.A != ushort.MaxValue;
                }
            }
            bool hadAlpha = declaredAlpha || anyTransparent;
            if (hadAlpha) notices.Add(anyTransparent ? "alpha channel dropped (the image has transparent pixels; colour kept as stored, not composited)" : "alpha channel dropped (fully opaque)");
            var t = torch.tensor(data, new long[] { 1, 3, h, w });
            return new LoadedImage(t, new ImageInfo(path, format, w, h, bitDepth, hadAlpha, notices));
        }
    }

    static int BitDepth(Image img, string format, int bpp)
    {
        if (format == "PNG") return img.Metadata.GetPngMetadata().BitDepth == PngBitDepth.Bit16 ? 16 : 8;
        if (format == "TIFF")
        {
            var bps = img.Frames.RootFrame.Metadata.GetTiffMetadata().BitsPerSample;
            if (bps.HasValue && bps.Value.Channel0 > 8) return 16;
            return 8;
        }
        return bpp >= 48 ? 16 : 8;
    }

    /// <summary>ImageSharp decodes some truncated files silently (missing rows come back grey); refuse them instead.</summary>
    static void CheckComplete(string path, string format, byte[] b)
    {
        if (format == "PNG")
        {
            // The last chunk must be IEND (length 0, type, CRC).
            var tail = b.AsSpan(Math.Max(0, b.Length - 64));
            if (tail.IndexOf("IEND"u8) < 0) throw new ImageFileException(path, "truncated PNG: no IEND chunk at the end of the file");
        }
        else if (format == "JPEG")
        {
            var tail = b.AsSpan(Math.Max(0, b.Length - 4096));
            if (tail.IndexOf(new byte[] { 0xFF, 0xD9 }) < 0) throw new ImageFileException(path, "truncated JPEG: no end-of-image marker");
        }
    }

    /// <summary>Float [N,3,H,W] (or [3,H,W]) in [0,1] → uint8 [N,H,W,3], truncating as the official code does by default.</summary>
    public static Tensor ToUInt8(Tensor x, Quantization q = Quantization.Truncate)
    {
        using var scope = torch.NewDisposeScope();
        var t = x.dim() == 3 ? x.unsqueeze(0) : x;
        if (t.dim() != 4 || t.shape[1] != 3) throw new ArgumentException($"expected [N,3,H,W] or [3,H,W], got [{string.Join(",", x.shape)}]");
        var s = t.to(ScalarType.Float32).mul(255f);
        if (q == Quantization.Round) s = s.round();
        var u = s.clamp(0f, 255f).to(ScalarType.Byte).permute(0, 2, 3, 1).contiguous();
        return u.MoveToOuterDisposeScope();
    }

    /// <summary>uint8 [N,H,W,3] → float32 [N,3,H,W] in [0,1] (the official <c>x / 255</c>).</summary>
    public static Tensor FromUInt8(Tensor hwc)
    {
        using var scope = torch.NewDisposeScope();
        var t = hwc.dim() == 3 ? hwc.unsqueeze(0) : hwc;
        return t.permute(0, 3, 1, 2).to(ScalarType.Float32).div(255f).contiguous().MoveToOuterDisposeScope();
    }

    /// <summary>PNG bytes of [1,3,H,W] / [3,H,W] in [0,1] (for notebooks and reports; no file is written).</summary>
    public static byte[] EncodePng(Tensor image, Quantization q = Quantization.Truncate)
    {
        using var img = ToImage(image, q);
        using var ms = new MemoryStream();
        img.Save(ms, new PngEncoder());
        return ms.ToArray();
    }

    static Image<Rgb24> ToImage(Tensor image, Quantization q)
    {
        using var u8 = image.dtype == ScalarType.Byte ? (image.dim() == 3 ? image.unsqueeze(0) : image.alias()) : ToUInt8(image, q);
        if (u8.shape[0] != 1) throw new ArgumentException($"one image at a time, got a batch of {u8.shape[0]}");
        int h = (int)u8.shape[1], w = (int)u8.shape[2];
        var bytes = u8.contiguous().data<byte>().ToArray();
        return Image.LoadPixelData<Rgb24>(bytes, w, h);
    }

    /// <summary>
    /// Saves [1,3,H,W] / [3,H,W] float in [0,1] (or uint8 [H,W,3]) as PNG or JPEG, chosen by extension. Written to a
    /// temporary file and renamed, so an interrupted save never leaves a partial image.
    /// </summary>
    public static void Save(string path, Tensor image, Quantization q = Quantization.Truncate, int jpegQuality = 95)
    {
        var ext = Path.GetExtension(path).ToLowerInvariant();
        IImageEncoder encoder = ext switch
        {
            ".png" => new PngEncoder(),
            ".jpg" or ".jpeg" => new JpegEncoder { Quality = jpegQuality },
            _ => throw new ImageFileException(path, $"cannot write '{ext}': output must be .png, .jpg or .jpeg"),
        };
        if ((image.dim() == 4 ? image.shape[0] : 1) != 1) throw new ImageFileException(path, $"can save one image at a time, got a batch of {image.shape[0]}");
        using var img = ToImage(image, q);
        AtomicFile.Write(path, fs => img.Save(fs, encoder));
    }
}
