// spdyframes: the Go SPDY framer (Debian's spdystream) as a reference for moorage's
// framing tests. "write" prints, one hex line each, a fixed list of frames as Go encodes
// them (header blocks through one compression context, in order); "read" decodes frames
// from stdin (through one decompression context) and prints one JSON object per frame.
package main

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"

	"github.com/moby/spdystream/spdy"
)

func write() {
	var buf bytes.Buffer
	f, err := spdy.NewFramer(&buf, nil)
	if err != nil {
		panic(err)
	}
	frames := []spdy.Frame{
		&spdy.SynStreamFrame{StreamId: 1, Headers: http.Header{"Streamtype": {"error"}}},
		&spdy.SynStreamFrame{StreamId: 3, Priority: 2, Headers: http.Header{"Streamtype": {"stdin"}}},
		&spdy.SynReplyFrame{StreamId: 1, Headers: http.Header{}},
		&spdy.DataFrame{StreamId: 3, Data: []byte("hello\n")},
		&spdy.DataFrame{StreamId: 3, Flags: spdy.DataFlagFin},
		&spdy.RstStreamFrame{StreamId: 5, Status: spdy.Cancel},
		&spdy.PingFrame{Id: 7},
		&spdy.GoAwayFrame{LastGoodStreamId: 3, Status: spdy.GoAwayOK},
		&spdy.HeadersFrame{StreamId: 3, Headers: http.Header{"X": {"a", "b"}}},
		&spdy.WindowUpdateFrame{StreamId: 3, DeltaWindowSize: 1000},
		&spdy.SettingsFrame{FlagIdValues: []spdy.SettingsFlagIdValue{{Flag: 1, Id: 7, Value: 65536}}},
	}
	for _, fr := range frames {
		buf.Reset()
		if err := f.WriteFrame(fr); err != nil {
			panic(err)
		}
		fmt.Println(hex.EncodeToString(buf.Bytes()))
	}
}

func read() {
	f, err := spdy.NewFramer(io.Discard, bufio.NewReader(os.Stdin))
	if err != nil {
		panic(err)
	}
	enc := json.NewEncoder(os.Stdout)
	for {
		fr, err := f.ReadFrame()
		if err == io.EOF {
			return
		}
		if err != nil {
			enc.Encode(map[string]string{"error": err.Error()})
			return
		}
		m := map[string]interface{}{"type": fmt.Sprintf("%T", fr)[6:]}
		switch x := fr.(type) {
		case *spdy.SynStreamFrame:
			m["stream_id"], m["headers"], m["flags"] = x.StreamId, x.Headers, x.CFHeader.Flags
		case *spdy.SynReplyFrame:
			m["stream_id"], m["headers"], m["flags"] = x.StreamId, x.Headers, x.CFHeader.Flags
		case *spdy.HeadersFrame:
			m["stream_id"], m["headers"], m["flags"] = x.StreamId, x.Headers, x.CFHeader.Flags
		case *spdy.DataFrame:
			m["stream_id"], m["data"], m["flags"] = x.StreamId, string(x.Data), x.Flags
		case *spdy.RstStreamFrame:
			m["stream_id"], m["status"] = x.StreamId, x.Status
		case *spdy.PingFrame:
			m["id"] = x.Id
		case *spdy.GoAwayFrame:
			m["last_good_stream_id"], m["status"] = x.LastGoodStreamId, x.Status
		}
		enc.Encode(m)
	}
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "read" {
		read()
		return
	}
	write()
}
