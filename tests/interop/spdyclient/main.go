// spdyclient: an independent SPDY/3.1 client of moorage's streaming server, built on
// Debian's golang-github-docker-spdystream-dev (the library client-go uses). It does what
// client-go's SPDY executor and kubectl's port-forward do:
//
//   - POST the URL with Connection/Upgrade: SPDY/3.1 and X-Stream-Protocol-Version
//     (v4, v3, v2, channel.k8s.io, or portforward.k8s.io), expect 101;
//   - exec/attach: create the error stream, then stdin, stdout, stderr and resize
//     (each waits for its SYN_REPLY); copy our stdin up (FIN at EOF), the output down,
//     send resizes as JSON, read the error stream to EOF and decode the v4 status;
//   - portforward: per connection an error stream (closed at once) and a data stream with
//     the same requestID; write the request, half-close, read to EOF, read the error;
//   - with -tunnel, the SPDY connection runs inside a WebSocket instead (KEP-4006), as
//     client-go's NewSPDYOverWebsocketDialer does for crictl and critest
//     (`-websocket-portforward`): GET with Sec-WebSocket-Protocol "SPDY/3.1+<protocol>",
//     then every SPDY byte in binary messages (Debian's golang-github-gorilla-websocket-dev,
//     the library client-go uses).
//
// The outcome goes to -result as JSON. Build: GO111MODULE=off GOPATH=/usr/share/gocode.
package main

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/gorilla/websocket"
	"github.com/moby/spdystream"
)

var (
	rawURL    = flag.String("url", "", "streaming URL")
	mode      = flag.String("mode", "exec", "exec (also attach) or portforward")
	protocols = flag.String("protocols", "v4.channel.k8s.io,v3.channel.k8s.io,v2.channel.k8s.io,channel.k8s.io", "offered protocols")
	stdin     = flag.Bool("stdin", false, "open a stdin stream (copied from our stdin)")
	stdout    = flag.Bool("stdout", true, "open a stdout stream")
	stderr    = flag.Bool("stderr", false, "open a stderr stream")
	tty       = flag.Bool("tty", false, "open a resize stream")
	sizes     = flag.String("sizes", "", "WxH,...: the first is sent at once, the next on each SIGUSR1")
	count     = flag.Bool("count", false, "count stdout bytes instead of copying them")
	result    = flag.String("result", "", "file for the JSON outcome")
	port      = flag.Int("port", 0, "portforward: the port")
	conns     = flag.Int("conns", 1, "portforward: parallel connections")
	request   = flag.String("request", "GET / HTTP/1.0\r\n\r\n", "portforward: bytes to send")
	tunnel    = flag.Bool("tunnel", false, "SPDY inside a WebSocket (KEP-4006)")
)

// tunnelPrefix is what client-go puts before each protocol it offers for the tunnel.
const tunnelPrefix = "SPDY/3.1+"

type outcome struct {
	HTTPStatus int               `json:"http_status"`
	Protocol   string            `json:"protocol"`
	Accepted   []string          `json:"accepted,omitempty"`
	Status     json.RawMessage   `json:"status,omitempty"`
	ErrorText  string            `json:"error_text,omitempty"`
	StdoutLen  int64             `json:"stdout_len"`
	StderrLen  int64             `json:"stderr_len"`
	Conns      []connResult      `json:"conns,omitempty"`
	Failure    string            `json:"failure,omitempty"`
	Extra      map[string]string `json:"extra,omitempty"`
}

type connResult struct {
	Len    int    `json:"len"`
	Sha256 string `json:"sha256"` // of the data after an HTTP header block
	Head   string `json:"head"`
	Error  string `json:"error"`
}

var out outcome

func finish(code int) {
	data, _ := json.Marshal(out)
	if *result != "" {
		_ = os.WriteFile(*result, data, 0o644)
	} else {
		fmt.Fprintln(os.Stderr, string(data))
	}
	os.Exit(code)
}

func fail(format string, args ...interface{}) {
	out.Failure = fmt.Sprintf(format, args...)
	finish(1)
}

// tunnelConn is a net.Conn over a WebSocket: each Write one binary message, Read the bytes
// of the messages in turn (client-go's TunnelingConnection does the same).
type tunnelConn struct {
	ws     *websocket.Conn
	reader io.Reader
	wmu    sync.Mutex
}

func (c *tunnelConn) Read(p []byte) (int, error) {
	for {
		if c.reader == nil {
			kind, r, err := c.ws.NextReader()
			if err != nil {
				if websocket.IsCloseError(err, websocket.CloseNormalClosure) {
					return 0, io.EOF
				}
				return 0, err
			}
			if kind != websocket.BinaryMessage {
				return 0, fmt.Errorf("tunnel: message of type %d, not binary", kind)
			}
			c.reader = r
		}
		n, err := c.reader.Read(p)
		if err == io.EOF {
			c.reader = nil
			if n > 0 {
				return n, nil
			}
			continue
		}
		return n, err
	}
}

func (c *tunnelConn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if err := c.ws.WriteMessage(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (c *tunnelConn) Close() error {
	c.wmu.Lock()
	_ = c.ws.WriteControl(websocket.CloseMessage,
		websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""), time.Now().Add(time.Second))
	c.wmu.Unlock()
	return c.ws.Close()
}

func (c *tunnelConn) LocalAddr() net.Addr                { return c.ws.LocalAddr() }
func (c *tunnelConn) RemoteAddr() net.Addr               { return c.ws.RemoteAddr() }
func (c *tunnelConn) SetDeadline(t time.Time) error      { return c.ws.UnderlyingConn().SetDeadline(t) }
func (c *tunnelConn) SetReadDeadline(t time.Time) error  { return c.ws.SetReadDeadline(t) }
func (c *tunnelConn) SetWriteDeadline(t time.Time) error { return c.ws.SetWriteDeadline(t) }

func upgradeTunnel() *spdystream.Connection {
	wsURL := "ws" + strings.TrimPrefix(*rawURL, "http")
	var offered []string
	for _, p := range strings.Split(*protocols, ",") {
		offered = append(offered, tunnelPrefix+p)
	}
	dialer := websocket.Dialer{Subprotocols: offered, HandshakeTimeout: 10 * time.Second}
	ws, resp, err := dialer.Dial(wsURL, nil)
	if resp != nil {
		out.HTTPStatus = resp.StatusCode
	}
	if err != nil {
		if resp != nil {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
			out.ErrorText = string(body)
			finish(2)
		}
		fail("websocket: %v", err)
	}
	out.Protocol = strings.TrimPrefix(ws.Subprotocol(), tunnelPrefix)
	if ws.Subprotocol() == "" {
		fail("no subprotocol negotiated")
	}
	sc, err := spdystream.NewConnection(&tunnelConn{ws: ws}, false)
	if err != nil {
		fail("spdy: %v", err)
	}
	go sc.Serve(spdystream.NoOpStreamHandler)
	return sc
}

func upgrade() *spdystream.Connection {
	if *tunnel {
		return upgradeTunnel()
	}
	u, err := url.Parse(*rawURL)
	if err != nil {
		fail("url: %v", err)
	}
	conn, err := net.DialTimeout("tcp", u.Host, 10*time.Second)
	if err != nil {
		fail("dial: %v", err)
	}
	req, _ := http.NewRequest("POST", *rawURL, nil)
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "SPDY/3.1")
	for _, p := range strings.Split(*protocols, ",") {
		req.Header.Add("X-Stream-Protocol-Version", p)
	}
	if err := req.Write(conn); err != nil {
		fail("write request: %v", err)
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		fail("read response: %v", err)
	}
	out.HTTPStatus = resp.StatusCode
	out.Protocol = resp.Header.Get("X-Stream-Protocol-Version")
	out.Accepted = resp.Header.Values("X-Accepted-Stream-Protocol-Versions")
	if resp.StatusCode != http.StatusSwitchingProtocols {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		out.ErrorText = string(body)
		finish(2)
	}
	if br.Buffered() > 0 {
		fail("server sent %d bytes before the client's first frame", br.Buffered())
	}
	sc, err := spdystream.NewConnection(conn, false)
	if err != nil {
		fail("spdy: %v", err)
	}
	go sc.Serve(spdystream.NoOpStreamHandler)
	return sc
}

func create(sc *spdystream.Connection, h http.Header) *spdystream.Stream {
	s, err := sc.CreateStream(h, nil, false)
	if err != nil {
		fail("create stream %v: %v", h, err)
	}
	if err := s.WaitTimeout(30 * time.Second); err != nil {
		fail("stream %v not accepted: %v", h, err)
	}
	return s
}

func sizeJSON(s string) []byte {
	var w, h int
	fmt.Sscanf(s, "%dx%d", &w, &h)
	data, _ := json.Marshal(map[string]int{"Width": w, "Height": h})
	return data
}

func remoteCommand() {
	sc := upgrade()
	typ := func(t string) http.Header { return http.Header{"Streamtype": []string{t}} }
	errorStream := create(sc, typ("error"))
	var in, so, se, rs *spdystream.Stream
	if *stdin {
		in = create(sc, typ("stdin"))
	}
	if *stdout {
		so = create(sc, typ("stdout"))
	}
	if *stderr {
		se = create(sc, typ("stderr"))
	}
	if *tty && out.Protocol != "v2.channel.k8s.io" && out.Protocol != "channel.k8s.io" {
		rs = create(sc, typ("resize"))
	}
	errc := make(chan []byte, 1)
	go func() { data, _ := io.ReadAll(errorStream); errc <- data }()
	if rs != nil && *sizes != "" {
		list := strings.Split(*sizes, ",")
		rs.Write(sizeJSON(list[0]))
		usr1 := make(chan os.Signal, 4)
		signal.Notify(usr1, syscall.SIGUSR1)
		go func() {
			for _, s := range list[1:] {
				<-usr1
				rs.Write(sizeJSON(s))
			}
		}()
	}
	if in != nil {
		go func() {
			io.Copy(in, os.Stdin)
			in.Close()
		}()
	}
	var wg sync.WaitGroup
	copyDown := func(s *spdystream.Stream, w io.Writer, n *int64) {
		defer wg.Done()
		if *count {
			w = io.Discard
		}
		*n, _ = io.Copy(w, s)
	}
	if so != nil {
		wg.Add(1)
		go copyDown(so, os.Stdout, &out.StdoutLen)
	}
	if se != nil {
		wg.Add(1)
		go copyDown(se, os.Stderr, &out.StderrLen)
	}
	wg.Wait()
	status := <-errc
	if out.Protocol == "v4.channel.k8s.io" {
		if len(status) > 0 && !json.Valid(status) {
			fail("status is not JSON: %q", status)
		}
		out.Status = status
	} else {
		out.ErrorText = string(status)
	}
	sc.Close()
	finish(0)
}

func portForward() {
	sc := upgrade()
	out.Conns = make([]connResult, *conns)
	var wg sync.WaitGroup
	var mu sync.Mutex // stream creation is sequential in kubectl too (one at a time)
	for i := 0; i < *conns; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			h := http.Header{}
			h.Set("Port", strconv.Itoa(*port))
			h.Set("Requestid", strconv.Itoa(i))
			h.Set("Streamtype", "error")
			mu.Lock()
			es := create(sc, h.Clone())
			es.Close()
			h.Set("Streamtype", "data")
			ds := create(sc, h)
			mu.Unlock()
			errc := make(chan []byte, 1)
			go func() { data, _ := io.ReadAll(es); errc <- data }()
			ds.Write([]byte(*request))
			ds.Close()
			body, readErr := io.ReadAll(ds)
			// The digest covers what follows an HTTP header block: headers such as Date
			// differ between connections made in different seconds.
			payload := body
			if j := bytes.Index(body, []byte("\r\n\r\n")); j >= 0 {
				payload = body[j+4:]
			}
			sum := sha256.Sum256(payload)
			head := string(body)
			if j := strings.Index(head, "\r\n"); j >= 0 {
				head = head[:j]
			}
			res := connResult{Len: len(body), Sha256: hex.EncodeToString(sum[:]), Head: head}
			select {
			case e := <-errc:
				res.Error = string(e)
				if readErr != nil {
					res.Error += fmt.Sprintf("(data stream: %v)", readErr)
				}
			case <-time.After(10 * time.Second):
				res.Error = "(error stream not closed)"
			}
			ds.Reset()
			es.Reset()
			out.Conns[i] = res
		}(i)
	}
	wg.Wait()
	sc.Close()
	finish(0)
}

func main() {
	flag.Parse()
	if *mode == "portforward" {
		explicit := false
		flag.Visit(func(f *flag.Flag) { explicit = explicit || f.Name == "protocols" })
		if !explicit {
			*protocols = "portforward.k8s.io"
		}
		portForward()
	}
	remoteCommand()
}
